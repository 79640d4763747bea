"""The rules that turn a request into the ranker's inputs, each decided here once.

Fine-tuning and evaluation (:func:`training.jobs.finetune.batch_tensors`), the experiments
and the scoring service (:class:`serving.model.ServingModel`) all feed the ranker through
these rules, so a model is served exactly as it was trained:

* **history length** (:func:`history_len`): how many of the newest events of a user's
  sequence the ranker reads;
* **candidate age** (:func:`candidate_age_s`): a candidate's age at the request, the input
  of the new-item rules (age dropout in training, content-only and expected-keep scoring at
  inference);
* **time gaps**: whether a new ranker feeds them (:func:`resolve_time_gaps`), what a saved
  config that predates the setting was trained with (:func:`saved_time_gaps`), whether the
  ranker reads event times at all (:func:`reads_event_times`) and the buckets it feeds the
  backbone (:func:`time_gap_buckets`).

The sequence tensors themselves come from one place too: :func:`training.data.encode_sequences`
(newest events, right-padded) and :meth:`training.data.SequenceArrays.tensors`, which
:mod:`training.data` keeps beside the table readers. Nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.model.backbone import bucketize_time_gaps

if TYPE_CHECKING:
    from training.model.ranker import RankerConfig

#: Whether a new ranker feeds time gaps when neither its fine-tuning settings nor a pretrained
#: backbone decide it: the offline tables and the online ``user_sequence`` both carry event times.
TIME_GAPS_DEFAULT = True
#: What a saved config without a ``time_gaps`` entry was trained with: configs are saved with
#: every field, so one without it predates the setting, when nothing fed time gaps.
TIME_GAPS_IF_UNSAVED = False


# -------------------------------------------------------------------- history length
def history_len(cfg: RankerConfig) -> int:
    """How many of the newest events of a user's sequence the ranker reads.

    Early fusion (``pinfm_early``, ``hybrid``) appends the candidate as one more token after
    the sequence, so one of the backbone's ``max_len`` positions stays free for it; every other
    mode reads up to ``max_len`` events. A ``hybrid`` ranker's published user embedding reads the
    same window of the user's history (the service encodes both with this length).
    """
    early = cfg.sequence in ("pinfm_early", "hybrid")  # training.model.ranker.EARLY_FUSION_MODES
    return cfg.backbone.max_len - 1 if early else cfg.backbone.max_len


# --------------------------------------------------------------------- candidate age
def candidate_age_s(created_s: np.ndarray, request_ts: np.ndarray | int) -> np.ndarray:
    """Age of each candidate at its request, in seconds; -1 where the creation time is unknown.

    Args:
        created_s: (...) int64 creation times in unix seconds, < 0 = unknown
            (:meth:`training.data.ItemCreatedAt.lookup`).
        request_ts: the request time(s) in unix seconds, broadcast against ``created_s``.

    Returns:
        (...) int64 ``request_ts - created_s``, -1 where unknown (an item created after the
        request also has a negative age, which the ranker treats as unknown).
    """
    created = np.asarray(created_s, dtype=np.int64)
    return np.where(created >= 0, np.asarray(request_ts, dtype=np.int64) - created, -1).astype(np.int64)


# ------------------------------------------------------------------------- time gaps
def resolve_time_gaps(requested: bool | None, pretrained: bool | None) -> bool:
    """Whether a new ranker feeds time gaps.

    Args:
        requested: the fine-tuning setting (``FinetuneConfig.time_gaps``); None = not set.
        pretrained: whether its backbone was pretrained with time gaps; None = no pretrained
            backbone.

    Returns:
        ``requested`` when set, else what the backbone was pretrained with, else
        :data:`TIME_GAPS_DEFAULT`.
    """
    if requested is not None:
        return bool(requested)
    return TIME_GAPS_DEFAULT if pretrained is None else bool(pretrained)


def saved_time_gaps(saved: Mapping[str, Any]) -> bool:
    """The ``time_gaps`` setting of a saved config (a ranker's, or a backbone's pretraining settings).

    A config without the entry predates the setting and was trained without time gaps
    (:data:`TIME_GAPS_IF_UNSAVED`), whatever today's default for new models is.
    """
    return bool(saved.get("time_gaps", TIME_GAPS_IF_UNSAVED))


def reads_event_times(cfg: RankerConfig) -> bool:
    """Whether the ranker reads a sequence's event times (``ts``) at all: only to feed time gaps."""
    return bool(cfg.time_gaps)


def time_gap_buckets(cfg: RankerConfig, seq: Mapping[str, Any]) -> torch.Tensor | None:
    """(U, L) log-time-gap buckets the backbone reads for a batch of sequences.

    Args:
        cfg: the ranker's config.
        seq: ``ts`` (U, L) int64 unix seconds (absent or None = unknown times) and
            ``pad_mask`` (U, L) bool.

    Returns:
        :func:`training.model.backbone.bucketize_time_gaps` of the event times, or None when
        the ranker feeds no gaps or the times are unknown (then no gaps at all, not zero gaps).
    """
    if not reads_event_times(cfg) or seq.get("ts") is None:
        return None
    return bucketize_time_gaps(seq["ts"], cfg.backbone.time_gap_buckets, seq["pad_mask"])
