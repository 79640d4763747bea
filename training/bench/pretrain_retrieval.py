"""Next-item retrieval of a pipeline-pretrained backbone on a held-out day.

``afm eval pretrain-retrieval --version V`` → :func:`pretrain_retrieval` → one JSON line.

For every user with a positive action (:data:`features.contract.POSITIVE_ACTIONS`) on day
``ds``, the history is their sequence as of the end of the day before
(``user_sequences/ds=<ds − 1>``, the newest ``max_len`` events) and the target is the
item of their first positive action on ``ds`` (valid events, by time). The backbone's
state after the last history event scores every item of the catalogue (``raw/items``,
created before the end of ``ds``) as it scored items in pretraining: the dot product, or
the cosine for a backbone pretrained with cosine scores, against the item's id + content
embedding. The whole catalogue is ranked and nothing is removed from it: users come back
to items they acted on before, and the share of such targets is reported
(``target_in_history``). Users without a history before ``ds`` are left out and counted.

The backbone must not have seen ``ds``: its pretraining corpus day must come before it
(the demo pretrains on the day before its last).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from features.config import Layout, day_window, previous_ds
from features.contract import POSITIVE_ACTIONS
from training.data import ContentTable, encode_sequence_frame, latest_day, read_partition
from training.jobs import registry
from training.model.backbone import PinFM, PinFMConfig, bucketize_time_gaps, last_hidden, resolve_device
from training.retrieval import paired_comparison, ranks_full, retrieval_metrics

log = logging.getLogger(__name__)

#: what every pipeline pretraining scored with before the artifact recorded its objective
LEGACY_SIMILARITY = "cosine"
KS: tuple[int, ...] = (10, 50)


@dataclass(frozen=True)
class HeldOutDay:
    """The users of a held-out day, their histories before it, their targets, and the catalogue.

    Attributes:
        ds: the held-out day.
        history: one row per scored user (``user_sequences`` of the day before: item_ids,
            actions, surfaces, ts lists), in the order of ``targets``.
        targets: (U,) item id of each user's first positive action on ``ds``.
        catalog: (I,) sorted ids of every item created before the end of ``ds``.
        n_without_history: users with a positive action on ``ds`` but no event before it.
    """

    ds: str
    history: pd.DataFrame
    targets: np.ndarray
    catalog: np.ndarray
    n_without_history: int

    @classmethod
    def load(cls, layout: Layout, ds: str) -> HeldOutDay:
        events = read_partition(layout.valid_events, ds, columns=["user_id", "item_id", "action", "ts", "event_id"])
        pos = events[events["action"].isin(POSITIVE_ACTIONS)].sort_values(["ts", "event_id"], kind="stable")
        first = pos.drop_duplicates("user_id", keep="first")  # (users of the day,)
        history_ds = previous_ds(ds)
        if history_ds not in layout.available_days(layout.user_sequences):
            raise FileNotFoundError(
                f"no user_sequences for ds={history_ds}, the day before {ds}: run the feature pipeline for it"
            )
        seqs = read_partition(
            layout.user_sequences, history_ds, columns=["user_id", "item_ids", "actions", "surfaces", "ts"]
        )
        seqs = seqs[seqs["item_ids"].map(len) > 0]
        merged = first[["user_id", "item_id"]].merge(seqs, on="user_id", how="inner").sort_values("user_id")
        if merged.empty:
            raise ValueError(f"no user with a positive action on {ds} has a history before it")
        items = pd.read_parquet(layout.items / "items.parquet", columns=["item_id", "created_at"])
        end = pd.Timestamp(day_window(ds)[1])
        catalog = np.sort(items.loc[items["created_at"] < end, "item_id"].to_numpy(np.int64))
        targets = merged["item_id"].to_numpy(np.int64)
        missing = np.setdiff1d(targets, catalog)
        if missing.size:
            raise ValueError(
                f"{missing.size} target items of {ds} are not in the catalogue, e.g. {missing[:5].tolist()}"
            )
        history = merged[["user_id", "item_ids", "actions", "surfaces", "ts"]].reset_index(drop=True)
        return cls(ds, history, targets, catalog, int(first["user_id"].nunique() - len(merged)))


def _similarity(art: dict) -> str:
    """How the artifact's pretraining scored items (recorded since the recipe; cosine before)."""
    return str((art["config"].get("objective") or {}).get("similarity", LEGACY_SIMILARITY))


@torch.no_grad()
def held_out_ranks(
    layout: Layout, version: str, day: HeldOutDay, device: str = "cpu", batch_size: int = 256
) -> tuple[torch.Tensor, dict]:
    """(U,) 0-based rank of each user's target among the catalogue, and what was scored.

    Raises:
        ValueError: the backbone's pretraining corpus includes the held-out day.
    """
    art = registry.load_artifact(layout, "pinfm", version)
    corpus_ds = art["data_version"].get("corpus_ds")
    if corpus_ds is not None and corpus_ds >= day.ds:
        raise ValueError(
            f"pinfm {version} was pretrained on corpus ds={corpus_ds}, which includes the held-out day {day.ds}: "
            "pretrain on an earlier day (afm train pretrain --ds <day before>)"
        )
    cfg = PinFMConfig.from_dict(art["config"]["model"])
    dev = resolve_device(device)
    model = PinFM(cfg)
    model.load_state_dict(art["state_dict"])
    model.to(dev).eval()
    similarity = _similarity(art)
    time_gaps = bool((art["config"].get("pretrain") or {}).get("time_gaps", False))
    content = ContentTable.from_layout(layout, cfg.content_dim)

    seqs = encode_sequence_frame(day.history, cfg.max_len)
    states = []
    for start in range(0, len(seqs), batch_size):
        b = seqs.tensors(np.arange(start, min(start + batch_size, len(seqs))), content, dev)
        gaps = bucketize_time_gaps(b["ts"], cfg.time_gap_buckets, b["pad_mask"]) if time_gaps else None
        hidden = model(b["item_ids"], b["action_ids"], b["surface_ids"], b["content"], None, time_gaps=gaps)
        states.append(last_hidden(hidden, b["pad_mask"]).float())  # (B, D)
    q = torch.cat(states)  # (U, D)
    ids = torch.as_tensor(day.catalog, device=dev)
    vecs = torch.as_tensor(content.lookup(day.catalog), device=dev) if len(content) else None
    items = model.item_embedding(ids, vecs).float()  # (I, D)
    if similarity == "cosine":
        q, items = F.normalize(q, dim=-1), F.normalize(items, dim=-1)
    target_cols = torch.as_tensor(np.searchsorted(day.catalog, day.targets), device=dev)  # (U,)
    ranks = ranks_full(q @ items.T, target_cols)  # (U,)
    seen = [int(t) in set(np.asarray(h).tolist()) for t, h in zip(day.targets, day.history["item_ids"], strict=True)]
    info = {
        "version": version,
        "corpus_ds": corpus_ds,
        "similarity": similarity,
        "time_gaps": time_gaps,
        "n_items": int(len(day.catalog)),
        "target_in_history": round(float(np.mean(seen)), 4),
    }
    return ranks.cpu(), info


def pretrain_retrieval(
    layout: Layout, versions: list[str] | None = None, ds: str | None = None, device: str = "cpu"
) -> dict:
    """HR/NDCG@10/50 and MRR of each backbone on the held-out day; with two, B − A paired per user.

    Args:
        layout: data root.
        versions: pinfm versions (None = the newest); two = a paired comparison, the second minus the first.
        ds: the held-out day (default: the latest day of valid events).
        device: where to score.

    Returns:
        {ds, history_ds, n_users, n_without_history, runs: [per version: metrics and what was
        scored], paired (with two versions: :func:`training.retrieval.paired_comparison`)}.
    """
    ds = ds or latest_day(layout, layout.valid_events)
    if not versions:
        newest = registry.latest_version(layout, "pinfm")
        if newest is None:
            raise FileNotFoundError(f"no pretrained pinfm under {layout.models / 'pinfm'}: run 'afm train pretrain'")
        versions = [newest]
    day = HeldOutDay.load(layout, ds)
    runs, all_ranks = [], []
    for v in versions:
        ranks, info = held_out_ranks(layout, v, day, device)
        m = retrieval_metrics(ranks, KS)
        m.pop("n")
        runs.append({**info, **{k: round(x, 5) for k, x in m.items()}})
        all_ranks.append(ranks)
        log.info("pretrain-retrieval %s on %s: hr@10=%.4f ndcg@10=%.4f", v, ds, m["hr@10"], m["ndcg@10"])
    out = {
        "ds": ds,
        "history_ds": previous_ds(ds),
        "n_users": int(len(day.targets)),
        "n_without_history": day.n_without_history,
        "runs": runs,
    }
    if len(all_ranks) == 2:
        out["paired"] = paired_comparison(all_ranks[0], all_ranks[1], ("ndcg@10", "hr@10", "mrr"))
    return out
